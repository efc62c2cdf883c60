"""The end-to-end workflow the demo walks through: `plan` (stages' work, prompt sets, output folder, search grid)."""
