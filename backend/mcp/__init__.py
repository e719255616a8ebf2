"""MCP servers: registration, connection (handshake + tool discovery), approval of changed tools."""
