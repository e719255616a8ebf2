"""The activity log: who did what, to which resource, from where."""
