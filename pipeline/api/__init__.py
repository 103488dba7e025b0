"""The server's HTTP side: the FastAPI app and the process that runs it."""
