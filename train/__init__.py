"""Preference training from votes, and model judges that vote: reads study/, uses engines/."""
