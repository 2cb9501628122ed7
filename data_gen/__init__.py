"""GPT-written visual instruction data from image captions and object boxes."""
