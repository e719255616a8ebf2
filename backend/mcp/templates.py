"""Well-known MCP servers with their settings pre-filled (GET /mcp/templates). HTTP ones
are usable anywhere the address guard allows; stdio ones only where an operator listed
a command of that name in MCP__STDIO_SERVERS (the listing, not the template, decides
what runs)."""

from __future__ import annotations

from backend.config import Settings
from backend.mcp.schemas import Template

HTTP_TEMPLATES = [
    Template(
        id="github",
        name="GitHub",
        description="Repositories, issues and pull requests (GitHub's remote MCP server).",
        transport="streamable_http",
        url="https://api.githubcopilot.com/mcp/",
        header_names=["Authorization"],
        docs="https://github.com/github/github-mcp-server",
    ),
    Template(
        id="linear",
        name="Linear",
        description="Issues and projects in Linear.",
        transport="sse",
        url="https://mcp.linear.app/sse",
        header_names=["Authorization"],
        docs="https://linear.app/docs/mcp",
    ),
    Template(
        id="sentry",
        name="Sentry",
        description="Errors, issues and releases from Sentry.",
        transport="streamable_http",
        url="https://mcp.sentry.dev/mcp",
        header_names=["Authorization"],
        docs="https://docs.sentry.io/product/sentry-mcp/",
    ),
    Template(
        id="deepwiki",
        name="DeepWiki",
        description="Questions about public GitHub repositories' documentation (no key).",
        transport="streamable_http",
        url="https://mcp.deepwiki.com/mcp",
        docs="https://docs.devin.ai/work-with-devin/deepwiki-mcp",
    ),
]

STDIO_TEMPLATES = [
    Template(
        id="filesystem",
        name="Filesystem",
        description="Files under a folder the operator chose.",
        transport="stdio",
        command="filesystem",
        docs="https://github.com/modelcontextprotocol/servers/tree/main/src/filesystem",
    ),
    Template(
        id="git",
        name="Git",
        description="A git repository the operator chose.",
        transport="stdio",
        command="git",
        docs="https://github.com/modelcontextprotocol/servers/tree/main/src/git",
    ),
]


def templates(settings: Settings) -> list[Template]:
    listed = settings.mcp.stdio_servers
    out = list(HTTP_TEMPLATES)
    for template in STDIO_TEMPLATES:
        out.append(template.model_copy(update={"available": template.command in listed}))
    # Every operator-listed server is a template of its own, with its allowed env names.
    for name, command in sorted(listed.items()):
        out.append(
            Template(
                id=f"stdio:{name}",
                name=name,
                description=command.description or f"operator-listed stdio server {name!r}",
                transport="stdio",
                command=name,
                env_names=list(command.env_keys),
            )
        )
    return out
