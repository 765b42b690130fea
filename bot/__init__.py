"""The Telegram front end: handlers, commands, progress messages, Telegram files as bytes."""
