"""Identity from outside bastion: access tokens of trusted issuers (`trusted_issuers`)."""
