"""Private helpers shared across skpatchcore: images, devices, validation."""
