"""The chat template of /v1/chat/completions.

Each message becomes one line `"{role}: {content}\\n"`, and the prompt ends with
`"assistant:"`, so the model writes the assistant's turn. For example the messages
`[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]` become

    system: Be brief.
    user: Hi
    assistant:

Generation stops at `"\\nuser:"`, the start of a next user turn, which the reply excludes.
Roles are system, developer, user and assistant. A message's content is a string or a
list of `{"type": "text", "text": ...}` parts, which are joined without a separator.

With a session (X-Session-Id), send only the new messages, because the session's memory
already contains the earlier turns. On a session that has absorbed tokens, the rendered
text starts with a newline, so a new turn begins on its own line after a reply that was
cut at max_tokens.

NOTE: a reply that ended at the stop string leaves `"\nuser:"` in the session's memory
(the engine keeps a stop string's tokens), so the memory then reads `"\nuser:\nuser: ..."`
at the next turn.
"""

from __future__ import annotations

CHAT_ROLES = ("system", "developer", "user", "assistant")
CHAT_STOP = "\nuser:"
ASSISTANT_PREFIX = "assistant:"


def render_chat(messages: list[tuple[str, str]], continuation: bool = False) -> str:
    """Render (role, content) pairs with the template. The roles must be in CHAT_ROLES.

    `continuation` marks a session that has absorbed tokens, whose text gets a leading newline.
    """
    lines = [f"{role}: {content}\n" for role, content in messages]
    return ("\n" if continuation else "") + "".join(lines) + ASSISTANT_PREFIX
