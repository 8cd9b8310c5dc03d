"""Uses of a compiled model for inference: the model object of a checkpoint (`pretrained`) and text generation over KV caches (`generation`)."""
