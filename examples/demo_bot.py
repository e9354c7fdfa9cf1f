"""The demo bot: shows it received its key from `credbroker run`, without showing the secret.

Run it the way every bot runs under credbroker:

    credbroker run --profile demo -- python examples/demo_bot.py
"""

import hashlib
import hmac
import os
import sys
import time

api_key = os.environ.get("BINANCE_API_KEY")
api_secret = os.environ.get("BINANCE_API_SECRET")
if not api_key or not api_secret:
    sys.exit("demo bot: BINANCE_API_KEY / BINANCE_API_SECRET not set; run me under `credbroker run`")

# A signed Binance query, as a real bot would send it (HMAC-SHA256 of the query string).
query = f"symbol=BTCUSDT&side=BUY&type=MARKET&quantity=0.001&recvWindow=5000&timestamp={int(time.time() * 1000)}"
signature = hmac.new(api_secret.encode(), query.encode(), hashlib.sha256).hexdigest()

print("demo bot: started by credbroker run (broker pid %s, profile %s)"
      % (os.environ.get("CREDBROKER_RUN"), os.environ.get("CREDBROKER_PROFILE")))
print(f"demo bot: API key      ****{api_key[-4:]}")
print(f"demo bot: API secret   received, {len(api_secret)} characters (never printed)")
print(f"demo bot: VAULT_TOKEN  {'present (BAD)' if 'VAULT_TOKEN' in os.environ else 'not inherited (good)'}")
print(f"demo bot: signed query {query}&signature={signature[:16]}...")
