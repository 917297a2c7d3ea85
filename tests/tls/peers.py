"""Bare TLS servers in a thread, for the tests of what the node's policy refuses and the controls
showing that the same handshake succeeds without it."""

import contextlib
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

#: RFC 7919's ffdhe2048 group (``openssl genpkey -genparam -algorithm DH -pkeyopt group:ffdhe2048``):
#: a server needs DH parameters to offer DHE suites; a constant, so no test waits on ``dhparam``.
FFDHE2048 = """-----BEGIN DH PARAMETERS-----
MIIBCAKCAQEA//////////+t+FRYortKmq/cViAnPTzx2LnFg84tNpWp4TZBFGQz
+8yTnc4kmz75fS/jY2MMddj2gbICrsRhetPfHtXV/WVhJDP1H18GbtCFY2VVPe0a
87VXE15/V8k1mE8McODmi3fipona8+/och3xWKE2rec1MKzKT0g6eXq8CrGCsyT7
YdEIqUuyyOP7uWrat2DX9GgdT0Kj3jlN9K5W7edjcrsZCwenyO4KbXCeAvzhzffi
7MA0BM0oNC9hkXL+nOmFg/+OTxIy7vKBg8P+OxtMb61zO7X8vC7CIAXFjvGDfRaD
ssbzSibBsu/6iGtCOGEoXJf//////////wIBAg==
-----END DH PARAMETERS-----
"""


def tls12_server_context(certificate: Path, private_key: Path, ciphers: str, folder: Path) -> ssl.SSLContext:
    """A TLS 1.2 server context offering exactly ``ciphers`` (DHE ones included), no policy."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(ciphers)
    params = folder / "ffdhe2048.pem"
    params.write_text(FFDHE2048)
    context.load_dh_params(str(params))
    context.load_cert_chain(certificate, private_key)
    return context


@contextlib.contextmanager
def tls_server(context: ssl.SSLContext) -> Iterator[int]:
    """Serve TLS handshakes on a free loopback port until the block ends; yields the port.

    Each connection is handshaken, then closed; a failed handshake only closes it.
    """
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)  # the loop checks for the end this often
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            try:
                raw, _ = listener.accept()
            except TimeoutError:
                continue
            raw.settimeout(5.0)
            with contextlib.suppress(OSError), context.wrap_socket(raw, server_side=True) as conn:
                # TLS 1.3: the client certificate is checked here, after the client's handshake
                conn.recv(1)
            raw.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        done.set()
        thread.join(timeout=5.0)
        listener.close()


def handshake(port: int, context: ssl.SSLContext, server_name: str = "127.0.0.1") -> tuple[str, str]:
    """A client handshake with ``context``: the protocol version and suite agreed."""
    with socket.create_connection(("127.0.0.1", port), timeout=5.0) as raw, \
            context.wrap_socket(raw, server_hostname=server_name) as conn:
        cipher = conn.cipher()
        assert cipher is not None
        return str(conn.version()), cipher[0]
