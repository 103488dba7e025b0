"""Who may do what: worker tokens, API keys, signed messages, transfer grants, audit."""
