"""Small helpers every library shares: user errors, files written atomically, numbers formatted."""
