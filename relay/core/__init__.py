"""Sans-I/O core: pure logic with time passed in. No sockets, no Redis, no asyncio here."""
