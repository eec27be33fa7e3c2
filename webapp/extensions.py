"""Flask extensions, created unbound so blueprints import them without cycles."""
from flask_login import LoginManager
from flask_wtf.csrf import CSRFProtect

login_manager = LoginManager()
login_manager.login_view = "auth.login"
login_manager.login_message = "Please sign in to see that page."

# Every form POST carries a token; the JSON API (bearer-token auth, no cookies) is exempt.
csrf = CSRFProtect()
