"""One small program per server kind (mtad, accessd, dird, mssd, dnsd, monitord).

Each module here only has a ``main()``: parse arguments, load the config,
run the kind's app on :mod:`intermail.net.runner`.  Nothing in
``intermail`` imports this package.
"""
