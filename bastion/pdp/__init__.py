"""Standard decision-point APIs over `bastion.decide`: OpenID AuthZEN 1.0 (`bastion.pdp.authzen`)."""
