"""The tiny recipe: curriculum, stand-ins for the pretrained weights, and the four stages (`python -m recipes.tiny.train_default`)."""
