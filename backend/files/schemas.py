"""Bodies of /tools/files: metadata only; bytes travel as multipart in and as a
download out."""

from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, ConfigDict


class FileRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    workspace_id: uuid.UUID
    uploaded_by: uuid.UUID | None
    name: str
    size: int
    content_type: str
    sha256: str
    created_at: datetime
    updated_at: datetime
