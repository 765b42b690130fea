"""The Telegram front end: handlers, commands, progress messages and Telegram files as a byte source."""
