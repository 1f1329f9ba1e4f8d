"""The built-in default model's world: procedural 64x64 scenes with captions, and a pixel judge of adherence."""
