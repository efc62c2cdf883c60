"""The pipeline: recipes and frozen configs, model loading, apply(pipe, recipe) and generate()."""
