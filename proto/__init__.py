"""ferry wire protocol: sans-IO framing, messages, state machines. No sockets, no asyncio."""
