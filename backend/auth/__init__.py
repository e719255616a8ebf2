"""Identity and access: sign-in codes, tokens, sessions, API keys, roles and permissions."""
