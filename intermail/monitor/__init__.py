"""The monitor sidecar: probes every instance at protocol level and acts on what it sees.

:mod:`.state` decides (UP / SUSPECT / DOWN, pure code); :mod:`.probes` asks
each instance the question its protocol allows; the app
(:mod:`intermail.apps.monitor`) turns decisions into DNS updates and store
take-overs.
"""
