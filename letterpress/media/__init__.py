"""Media inputs for the vision tower: images (`image`) and video frames (`video`). Plain data in, tensors and
prompt text out; nothing here knows about the model's modules."""
