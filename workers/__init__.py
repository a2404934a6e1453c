"""Worker entry points: one generation worker per device, the maintenance worker."""
