"""Content parts of input messages and tool outputs (`input_text`, `input_image`,
`input_file`, `refusal`), as both specs define them, and the text a model reads of them
where it cannot see images or files."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    StrictStr,
    Tag,
    field_validator,
    model_validator,
)

# What engines that cannot see images read where an image was.
IMAGE_PLACEHOLDER = "[image omitted: this model cannot see images]"
# Files whose bytes are text (given to the model as text); by MIME type, else by name.
_TEXT_TYPES = (
    "text/",
    "application/json",
    "application/xml",
    "application/yaml",
    "application/x-yaml",
    "application/javascript",
    "application/x-sh",
    "application/toml",
    "application/sql",
)
_TEXT_SUFFIXES = (
    ".txt",
    ".md",
    ".json",
    ".csv",
    ".tsv",
    ".xml",
    ".yaml",
    ".yml",
    ".toml",
    ".py",
    ".js",
    ".ts",
    ".rs",
    ".go",
    ".java",
    ".c",
    ".h",
    ".cpp",
    ".sh",
    ".html",
    ".css",
    ".sql",
    ".log",
    ".ini",
    ".cfg",
    ".rst",
    ".jsonl",
)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: Literal["input_text", "output_text"]
    text: StrictStr


class RefusalPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["refusal"]
    refusal: StrictStr


class ImagePart(BaseModel):
    """An image by URL or data URL; tether never fetches a URL (no network at run time)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["input_image"]
    image_url: StrictStr
    detail: Literal["low", "high", "auto", "original"] | None = None

    @field_validator("image_url")
    @classmethod
    def _url(cls, url: str) -> str:
        if not url.startswith(("data:image/", "https://", "http://")):
            raise ValueError("expected an http(s) URL or a data:image/... URL")
        return url


class FilePart(BaseModel):
    """A file given inline whose bytes are text (its text goes to the model). A file by
    id or URL, or a binary one, is refused: tether has no files API, fetches nothing,
    and would otherwise drop the file silently."""

    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["input_file"]
    file_data: StrictStr | None = None
    filename: StrictStr | None = None
    file_id: None = None
    file_url: None = None
    detail: StrictStr | None = None

    @model_validator(mode="after")
    def _text(self) -> FilePart:
        if self.file_data is None:
            raise ValueError("only files given inline as text in 'file_data' are supported")
        file_text(self.file_data, self.filename)  # raises ValueError when not text
        return self


def file_text(data: str, filename: str | None) -> str:
    """The text of inline file data: a data URL of a text type, or base64 of a file whose
    name says it is text."""
    if data.startswith("data:"):
        head, sep, payload = data.partition(",")
        mime = head[5:].split(";")[0].lower()
        if not sep or not mime.startswith(_TEXT_TYPES):
            raise ValueError(
                f"file type {mime or 'unknown'!r} is not text; only text files are supported"
            )
        raw = _b64(payload) if head.endswith(";base64") else payload.encode()
    elif filename and filename.lower().endswith(_TEXT_SUFFIXES):
        raw = _b64(data)
    else:
        raise ValueError(
            "expected a data URL of a text type (data:text/plain;base64,...) or "
            "base64 with a text filename"
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("the file is not UTF-8 text") from None


def _b64(payload: str) -> bytes:
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("file_data is not valid base64") from None


def _part_type(part: Any) -> str:
    kind = part.get("type") if isinstance(part, dict) else getattr(part, "type", None)
    # Tags with a `-`: `_is_type_tag` drops them from error locations.
    return {"input_image": "image-part", "input_file": "file-part", "refusal": "refusal-part"}.get(
        kind if isinstance(kind, str) else "", "text-part"
    )


Part = Annotated[
    Annotated[ContentPart, Tag("text-part")]
    | Annotated[ImagePart, Tag("image-part")]
    | Annotated[FilePart, Tag("file-part")]
    | Annotated[RefusalPart, Tag("refusal-part")],
    Discriminator(_part_type),
]
