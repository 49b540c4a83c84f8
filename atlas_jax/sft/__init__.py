"""SFT: the loss, the update step and its builder, the loop."""
