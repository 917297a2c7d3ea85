"""Split a ``multipart/related`` body in tests, to compare parts byte for byte (dicomweb-client
hands back parsed data sets)."""

import requests


def parts(response: requests.Response) -> list[tuple[dict[str, str], bytes]]:
    """(headers, body) of each part of a multipart response."""
    response.raise_for_status()
    content_type = response.headers["Content-Type"]
    boundary = next(p.split("=", 1)[1].strip('"') for p in content_type.split(";")
                    if p.strip().startswith("boundary="))
    found = []
    for chunk in response.content.split(b"--" + boundary.encode())[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, body = chunk[2:].partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n") if line)
        found.append((headers, body[:-2]))  # the CRLF before the next delimiter
    return found
