"""Training: state, optimizer, SFT loss and step."""
