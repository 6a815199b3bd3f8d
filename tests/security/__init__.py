"""The least-privilege model: an owner role migrates, an application role runs, strangers fail."""
