"""Per-workspace quotas: limits, usage against them, and admission of work."""
