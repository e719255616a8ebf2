"""The console: static pages served by the API at /console."""
