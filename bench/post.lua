-- The hook request: POST /api/v1/dh with the token, as `curl --data` sends it.
-- Each request names a new tag (1.2.1, 1.2.2, ...), as successive CI runs do, so that the
-- deployer supersedes all but the newest and rolls that out; BODY sends one fixed body instead.
-- CLOSE=1 asks for a new connection per request, as CI jobs calling once each do.
wrk.method = "POST"
wrk.headers["X-Deploy-Hook-Token"] = os.getenv("TOKEN") or "none"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
if os.getenv("CLOSE") == "1" then
  wrk.headers["Connection"] = "close"
end

local body = os.getenv("BODY")
if body and body ~= "" then
  wrk.body = body
else
  local n = 0
  request = function()
    n = n + 1
    return wrk.format(nil, nil, nil, '{"imageTag":"1.2.' .. n .. '"}')
  end
end
