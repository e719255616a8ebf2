"""Bodies of /agents."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from backend.auth.schemas import Name, StrictInput


class BuiltinTool(StrictInput):
    type: Literal["builtin"] = "builtin"
    name: Literal["current_time", "http_request", "web_read", "web_search"]


class McpTools(StrictInput):
    """Tools of an MCP server of the workspace (its approved ones only; all of them
    when `tools` is empty)."""

    type: Literal["mcp"]
    server_id: uuid.UUID
    tools: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        default_factory=list, max_length=100
    )


AgentTool = Annotated[BuiltinTool | McpTools, Field(discriminator="type")]


class AgentFields(StrictInput):
    description: str = Field(default="", max_length=5000)
    system_prompt: str = Field(default="", max_length=100_000)
    model: str | None = Field(default=None, min_length=1, max_length=100)
    temperature: float | None = Field(default=None, ge=0, le=1)
    max_tokens: int = Field(default=1024, ge=1, le=64_000)
    tools: list[AgentTool] = Field(default_factory=list, max_length=50)
    permissions: dict[str, Any] = Field(default_factory=dict)
    memory: dict[str, Any] = Field(default_factory=dict)
    # Other agents of the workspace this one may call as tools.
    sub_agents: list[uuid.UUID] = Field(default_factory=list, max_length=20)
    metadata: dict[str, Any] = Field(default_factory=dict)


class AgentCreate(AgentFields):
    name: Name


class AgentUpdate(StrictInput):
    name: Name | None = None
    description: str | None = Field(default=None, max_length=5000)
    system_prompt: str | None = Field(default=None, max_length=100_000)
    model: str | None = Field(default=None, min_length=1, max_length=100)
    temperature: float | None = Field(default=None, ge=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1, le=64_000)
    tools: list[AgentTool] | None = Field(default=None, max_length=50)
    permissions: dict[str, Any] | None = None
    memory: dict[str, Any] | None = None
    sub_agents: list[uuid.UUID] | None = Field(default=None, max_length=20)
    metadata: dict[str, Any] | None = None


class AgentRead(BaseModel):
    model_config = ConfigDict(from_attributes=True, populate_by_name=True)

    id: uuid.UUID
    workspace_id: uuid.UUID
    name: str
    description: str
    system_prompt: str
    model: str
    temperature: float | None
    max_tokens: int
    tools: list[dict[str, Any]]
    permissions: dict[str, Any]
    memory: dict[str, Any]
    sub_agents: list[uuid.UUID]
    metadata: dict[str, Any] = Field(validation_alias="meta")
    created_by: uuid.UUID | None
    created_at: datetime
    updated_at: datetime


class AgentTest(StrictInput):
    input: str = Field(min_length=1, max_length=100_000)
    max_iterations: int = Field(default=5, ge=1, le=20)


class ToolCallRead(BaseModel):
    id: str
    name: str
    input: dict[str, Any]
    output: Any
    error: str | None
    duration_ms: float


class UsageRead(BaseModel):
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int


class AgentTestResult(BaseModel):
    output: str
    stop_reason: str
    iterations: int
    model: str
    tool_calls: list[ToolCallRead]
    usage: UsageRead
    cost_usd: float | None
    duration_ms: float
