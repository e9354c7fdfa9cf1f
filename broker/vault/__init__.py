"""The one place that speaks to Vault/OpenBao.

- ``settings``: where and how to reach Vault, resolved once, each value knowing where it came from;
- ``session``: the HTTP session every Vault call goes through (TLS trust, the redirect rule, a total
  deadline per request, Vault's answers mapped to credbroker's errors, server text scrubbed);
- ``token``: every token operation: logging in (the token, or AppRole), logging in again, lookup,
  renewal, revocation, telling a dead token from a denying policy, the child's scoped signing token;
- ``transport``: the requests machinery behind that session (imported only when a client is built);
- ``kv``, ``transit``, ``system`` (and ``token``): every other Vault call of the product, one hvac call each inside
  ``session.mapped`` (nothing outside this package touches an hvac client's API);
- ``paths``: the one check of every path segment a user gives (KV path, mount, transit key).

Nothing here imports hvac or requests at module level: ``credbroker run`` with a keyring profile never
pays for them.
"""
