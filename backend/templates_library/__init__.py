"""Ready workflows to start from: built-in templates and the ones a workspace publishes."""
