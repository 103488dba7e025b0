"""Signed webhooks: a task submitted with a ``callback_url`` is POSTed to it when it ends.

- ``signing``: the ``Morag-Signature`` header (HMAC-SHA256 of ``<timestamp>.<body>``).
- ``deliveries``: each task's delivery in the server's database, claimed by one server at a time.
- ``payload``: the JSON summary of an ended task.
- ``courier``: the server's thread that sends due deliveries and retries them with backoff.

The secret that signs a key's webhooks is ``pipeline.security.webhook_secrets``. What a
receiver gets, and how it checks it, is docs/webhooks.md.
"""
