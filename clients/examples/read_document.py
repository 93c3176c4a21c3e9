"""Read a long document into a session with `append`, piece by piece, then ask about it.

    python clients/examples/read_document.py [FILE] [--question TEXT]

Each piece enters the session's neural memory. The server keeps a fixed-size state instead
of the text, so the document can be far longer than the attention window. Without FILE the
example reads a short built-in passage. Reads TITANS_URL (default http://127.0.0.1:8000),
TITANS_API_KEY when the server requires keys, and EXAMPLE_MAX_TOKENS (default 80), the
maximum tokens of the answer.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Iterator

from titans_client import TitansClient, TitansError

MAX_TOKENS = int(os.environ.get("EXAMPLE_MAX_TOKENS", "80"))

# The prologue of Romeo and Juliet (public domain).
SAMPLE = """Two households, both alike in dignity,
In fair Verona, where we lay our scene,
From ancient grudge break to new mutiny,
Where civil blood makes civil hands unclean.
From forth the fatal loins of these two foes
A pair of star-cross'd lovers take their life;
Whose misadventured piteous overthrows
Do with their death bury their parents' strife.
The fearful passage of their death-mark'd love,
And the continuance of their parents' rage,
Which, but their children's end, nought could remove,
Is now the two hours' traffic of our stage;
The which if you with patient ears attend,
What here shall miss, our toil shall strive to mend.
"""


def pieces(text: str, max_chars: int) -> Iterator[str]:
    """Split ``text`` into pieces of at most ``max_chars`` characters, at line ends where possible."""
    start = 0
    while start < len(text):
        end = min(len(text), start + max_chars)
        if end < len(text):
            line_end = text.rfind("\n", start, end)
            if line_end > start:
                end = line_end + 1
        yield text[start:end]
        start = end


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file", nargs="?", help="UTF-8 text file to read (default: a built-in passage)")
    parser.add_argument("--question", default="Where do the two households live?", help="question to ask")
    parser.add_argument("--piece-chars", type=int, default=4000,
                        help="characters per append request (default: 4000)")
    args = parser.parse_args()
    document = Path(args.file).read_text(encoding="utf-8") if args.file else SAMPLE

    with TitansClient() as client:
        session = client.create_session(metadata={"example": "read_document"})
        print(f"session {session.id}: reading {len(document)} characters")
        for number, piece in enumerate(pieces(document, args.piece_chars), start=1):
            appended = client.append(session.id, piece)
            print(f"  piece {number}: +{appended.usage.prompt_tokens} tokens, "
                  f"{appended.session_tokens} in memory")

        info = client.get_session(session.id)
        print(f"memory state: {info.state_bytes} bytes after {info.tokens} tokens")

        # The question continues the same session, so the answer is generated from the memory.
        prompt = f"\n\nQuestion: {args.question}\nAnswer:"
        print(f"Q: {args.question}\nA:", end="", flush=True)
        with client.generate(session.id, prompt, max_tokens=MAX_TOKENS, temperature=0.0, stop=["\n\n"],
                             stream=True) as stream:
            for delta in stream:
                print(delta, end="", flush=True)
        print()
        client.delete_session(session.id)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TitansError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
