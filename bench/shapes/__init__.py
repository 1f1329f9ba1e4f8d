"""The built-in default model's eval: prompts from its scene world (export/recipes/shapes/dataset.py) and a pixel judge
of adherence."""
