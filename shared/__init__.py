"""What the webhook and the worker both need: settings, Redis access, the bot store, schemas, logging."""
