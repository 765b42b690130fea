"""The aiohttp server: signed streaming with Range, the REST API, WebSocket push, the dashboard."""
