"""The tools API (/api/v1/tools): chat, web read, web search and image generation, and
the same web read and search as built-in agent tools."""
