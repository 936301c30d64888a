"""The tiny recipe (`python -m recipes.tiny.train_default`): curriculum, pretraining stand-ins, four stages."""
