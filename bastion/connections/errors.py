"""The refusal a user's connection gives when it cannot be used now: raised by
`bastion.connections.service`, caught by the gateway's upstream credentials, which import it
from here rather than load the whole service with every gateway."""


class ConnectionUnavailable(Exception):
    """The user's connection exists but cannot be used now (the upstream's authorization server
    cannot be reached to refresh it): the call fails, nothing is sent upstream."""
