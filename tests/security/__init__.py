"""Attacks from the outside security and reliability review (issue 9), tried against a real
`bastion serve`: each test tries to break a rule and must be refused."""
