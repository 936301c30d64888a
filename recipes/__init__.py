"""The recipes that build this repository's models; `recipes.tiny` builds the embedded default (`tiny_model/`)."""
