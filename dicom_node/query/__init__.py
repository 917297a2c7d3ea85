"""Query/Retrieve: matching shared by C-FIND and (later) QIDO-RS (:mod:`.match`), and the C-FIND,
C-GET and C-MOVE handlers of the node's SCP (:mod:`.scp`)."""
