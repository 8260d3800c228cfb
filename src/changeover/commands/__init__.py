"""The bodies of the `changeover` commands, imported only when a command runs.

`changeover.cli` declares the commands (their arguments and help, all that
`--help` needs) and imports nothing heavy; each command's body lives in a module
here that pays for what it uses (pydantic, asyncio, aiohttp, Rich) when it runs.
This package's own namespace stays as light as cli.py: the exit codes only.
"""

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_REFUSED, EXIT_STOPPED = 0, 1, 2, 3, 4
