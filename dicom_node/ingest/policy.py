"""Association policy: which peers may associate with the node, and how others are rejected."""

from dataclasses import dataclass

from dicom_node.ingest.status import RejectReason, RejectResult, RejectSource


@dataclass(frozen=True)
class Rejection:
    """Why an association request is rejected, as the A-ASSOCIATE-RJ fields and a log line."""

    result: RejectResult
    source: RejectSource
    reason: RejectReason
    description: str


@dataclass(frozen=True)
class AssociationPolicy:
    """The node's rules for accepting an association request.

    Parameters
    ----------
    ae_title
        The called AE title the node answers to.
    allowed_peers
        Calling AE titles allowed to store (the store role), each optionally as ``AET@host`` to
        also require the peer's IP address or host name; empty lets any calling AE title store.
    query_peers
        Calling AE titles allowed to query and retrieve (C-FIND, C-GET, C-MOVE), in the same form;
        ``"*"`` lets every peer that ``allowed_peers`` admits (so, with ``allowed_peers`` empty,
        any peer): it never widens admission. Empty lets none (the index holds patient names and
        IDs). A peer with neither role is rejected at association.
    max_associations
        How many associations may be open at once; one more is rejected as transient.
    max_associations_per_host
        How many of them one host may hold; one more from that host is rejected as transient.
        Below ``max_associations``, so that one host (or a few) cannot hold them all.
    """

    ae_title: str
    allowed_peers: tuple[str, ...] = ()
    query_peers: tuple[str, ...] = ()
    max_associations: int = 16
    max_associations_per_host: int = 8

    def check(
        self, called_ae_title: str, calling_ae_title: str, address: str, open_associations: int,
        host_associations: int = 0,
    ) -> Rejection | None:
        """Return the rejection for a request, or None to accept it.

        ``open_associations`` counts the associations already open, not this one;
        ``host_associations`` those of them from the requestor's host.
        """
        if called_ae_title.strip() != self.ae_title:
            return Rejection(
                RejectResult.PERMANENT, RejectSource.SERVICE_USER,
                RejectReason.CALLED_AE_TITLE_NOT_RECOGNIZED,
                f"called AE title {called_ae_title.strip()!r} is not {self.ae_title!r}",
            )
        if not (self.may_store(calling_ae_title, address) or self.may_query(calling_ae_title, address)):
            return Rejection(
                RejectResult.PERMANENT, RejectSource.SERVICE_USER,
                RejectReason.CALLING_AE_TITLE_NOT_RECOGNIZED,
                f"calling AE title {calling_ae_title.strip()!r} from {address} "
                "is not in allowed_peers" + (" or query_peers" if self.query_peers else ""),
            )
        if open_associations >= self.max_associations:
            return Rejection(
                RejectResult.TRANSIENT, RejectSource.SERVICE_PROVIDER_PRESENTATION,
                RejectReason.LOCAL_LIMIT_EXCEEDED,
                f"{open_associations} associations already open (max_associations)",
            )
        if host_associations >= self.max_associations_per_host:
            return Rejection(
                RejectResult.TRANSIENT, RejectSource.SERVICE_PROVIDER_PRESENTATION,
                RejectReason.LOCAL_LIMIT_EXCEEDED,
                f"{host_associations} associations already open from this host "
                "(max_associations_per_host)",
            )
        return None

    def may_store(self, calling_ae_title: str, address: str) -> bool:
        """Whether the peer holds the store role (C-STORE)."""
        return not self.allowed_peers or _listed(self.allowed_peers, calling_ae_title.strip(), address)

    def may_query(self, calling_ae_title: str, address: str) -> bool:
        """Whether the peer holds the query/retrieve role (C-FIND, C-GET, C-MOVE)."""
        if "*" in self.query_peers and self.may_store(calling_ae_title, address):
            return True  # "*": every peer allowed_peers admits, never one it does not
        return _listed(self.query_peers, calling_ae_title.strip(), address)


def _listed(peers: tuple[str, ...], calling_ae_title: str, address: str) -> bool:
    for peer in peers:
        aet, _, host = peer.partition("@")
        if aet.strip() == calling_ae_title and (not host or host == address):
            return True
    return False
