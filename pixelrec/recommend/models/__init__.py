"""The sequence models (user towers). `registry` declares each one (torch-free, read by the command
line and `recommend.config`); the other modules hold their nn.Modules."""
