"""A small asyncio LMTP client for tests and load: one transaction at a time, replies per recipient.

Not the MTA's delivery client: it trusts the server's replies to be well
formed, pipelines nothing, and raises ``ConnectionError`` / ``TimeoutError``
on any trouble so that a test can reconnect and resend::

    client = await LmtpTestClient.connect(host, port)
    replies = await client.send("a@x", ["bob@y", "carol@y"], message, params=["XDELIVERYKEY=Q1"])
    # replies["bob@y"] == (250, "2.1.5 ...") -- RCPT-time refusals included

Logs: nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence


def dot_stuff(data: bytes) -> bytes:
    """The DATA form of ``data`` (CRLF line ends assumed), with the final ``.`` line."""
    if data.startswith(b"."):
        data = b"." + data
    data = data.replace(b"\r\n.", b"\r\n..")
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data + b".\r\n"


class LmtpTestClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float):
        self.reader = reader
        self.writer = writer
        self.timeout = timeout

    @classmethod
    async def connect(cls, host: str, port: int, *, timeout: float = 10.0, name: str = "test.client") -> LmtpTestClient:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
        client = cls(reader, writer, timeout)
        try:
            code, text = await client.reply()
            if code != 220:
                raise ConnectionError(f"greeting {code} {text}")
            code, text = await client.command(f"LHLO {name}")
            if code != 250:
                raise ConnectionError(f"LHLO {code} {text}")
        except BaseException:
            writer.close()
            raise
        return client

    async def reply(self) -> tuple[int, str]:
        lines = []
        async with asyncio.timeout(self.timeout):
            while True:
                line = await self.reader.readuntil(b"\r\n")
                lines.append(line[4:-2].decode("utf-8", "replace"))
                if line[3:4] != b"-":
                    return int(line[:3]), "\n".join(lines)

    async def command(self, line: str) -> tuple[int, str]:
        self.writer.write(line.encode("utf-8") + b"\r\n")
        await self.writer.drain()
        return await self.reply()

    async def send(self, sender: str, recipients: Sequence[str], data: bytes,
                   params: Sequence[str] = ()) -> dict[str, tuple[int, str]]:
        """One transaction; the reply for every recipient (RCPT refusals or after-DATA replies)."""
        extra = "".join(" " + p for p in params)
        code, text = await self.command(f"MAIL FROM:<{sender}>{extra}")
        if code != 250:
            await self.command("RSET")
            return {r: (code, text) for r in recipients}
        out: dict[str, tuple[int, str]] = {}
        accepted = []
        for r in recipients:
            out[r] = await self.command(f"RCPT TO:<{r}>")
            if out[r][0] == 250:
                accepted.append(r)
        if not accepted:
            await self.command("RSET")
            return out
        code, text = await self.command("DATA")
        if code != 354:
            return {r: (code, text) for r in recipients}
        self.writer.write(dot_stuff(data))
        await self.writer.drain()
        for r in accepted:
            out[r] = await self.reply()
        return out

    async def close(self) -> None:
        try:
            self.writer.write(b"QUIT\r\n")
            await asyncio.wait_for(self.reader.read(), 1.0)
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass
        finally:
            self.writer.close()
